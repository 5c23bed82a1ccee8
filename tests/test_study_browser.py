"""A rater in a real headless Chromium (Selenium 4, Debian's chromium + chromium-driver) against the
app under uvicorn: opens an invitation link, reads the instructions, starts, sees the three images
appear together and disappear after the display time (page-measured, with a tolerance for a loaded
2-core machine), cannot answer while they are shown, answers every trial with the mouse and with
both key pairs, reaches the thank-you page; every answer is then in the database as given.
Integrity in the browser: without an invite the page says so and starts nothing; an open study
refuses the address's session beyond its limit, saying so; a page reloaded while the images are
shown voids that trial and goes on; a second fetch of a shown image (a script in the page) is
refused, and that trial is void, never counted.

`SR3_STUDY_SCREENSHOTS=DIR` saves a screenshot of each trial while its images are shown (how
docs/study-trial.png was made)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import select

from pipelines.study import db as D
from pipelines.study.db import StudyDB
from study_support import invites, serve

pytestmark = pytest.mark.slow
LATE_MS = 1500  # how much later than the display time the images may disappear on a loaded machine

SLOTS_JS = """return ['left', 'lr', 'right'].map(function (s) {
  var i = document.getElementById('img-' + s);
  return [getComputedStyle(i).visibility, i.hasAttribute('src'), i.complete && i.naturalWidth > 0];
});"""


def test_a_rater_answers_a_whole_session_in_chromium(created_study, chromium, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    study, driver = created_study.study(), chromium
    display_ms = int(study.display_seconds * 1000)
    shots = os.environ.get("SR3_STUDY_SCREENSHOTS")
    db = f"sqlite:///{tmp_path}/answers.db"
    with serve(created_study.uri, db, tmp_path) as server:
        driver.get(server.url + "/?invite=" + invites(server, 1)[0])
        assert driver.find_element(By.ID, "question").text == study.question
        text = driver.find_element(By.TAG_NAME, "main").text
        assert f"You will see {study.trials_per_rater} pairs" in text and "shown for 1 second," in text
        assert "low-resolution input in the middle" in text
        driver.find_element(By.ID, "start").click()
        wait = WebDriverWait(driver, 30, poll_frequency=0.02)
        wait.until(lambda d: d.current_url.endswith("/trial"))
        stage = driver.find_element(By.ID, "stage")
        buttons = {side: driver.find_element(By.ID, f"choose-{side}") for side in ("left", "right")}
        choices = []
        for k in range(study.trials_per_rater):
            wait.until(lambda d: d.execute_script("return window.studyLog.length") == k + 1)
            slots = driver.execute_script(SLOTS_JS)
            since = driver.execute_script("return performance.now() - window.studyLog[window.studyLog.length - 1].shown")
            if since < display_ms - 150:  # still inside the display time: all three shown, no answer possible
                assert slots == [["visible", True, True]] * 3, slots
                assert stage.get_attribute("data-state") == "showing"
                assert not buttons["left"].is_enabled() and not buttons["right"].is_enabled()
                if shots:
                    driver.save_screenshot(str(Path(shots) / f"trial-{k}.png"))
                ActionChains(driver).send_keys("f").perform()  # ignored: the images are still shown
            wait.until(lambda d: stage.get_attribute("data-state") == "choosing")
            assert driver.execute_script(SLOTS_JS) == [["hidden", False, False]] * 3, "images gone after the display"
            entry = driver.execute_script("return window.studyLog[window.studyLog.length - 1]")
            assert "choice" not in entry, "a key pressed while the images were shown must not answer"
            shown_ms = entry["hidden"] - entry["shown"]
            assert display_ms - 20 <= shown_ms <= display_ms + LATE_MS, shown_ms
            assert driver.find_element(By.ID, "progress").text == f"Trial {k + 1} of {study.trials_per_rater}"
            side = ("right", "left")[k % 2]
            if k % 3 == 0:
                ActionChains(driver).move_to_element(buttons[side]).click().perform()
            elif k % 3 == 1:
                ActionChains(driver).send_keys(Keys.ARROW_LEFT if side == "left" else Keys.ARROW_RIGHT).perform()
            else:
                ActionChains(driver).send_keys("f" if side == "left" else "j").perform()
            choices.append(side)
        wait.until(lambda d: d.current_url.endswith("/thanks"))
        code = driver.find_element(By.ID, "code").text

    store = StudyDB(db, study)
    try:
        rows = store.export()
        with store.engine.connect() as conn:
            rater = conn.execute(select(D.raters)).mappings().one()
    finally:
        store.close()
    assert [row["choice"] for row in rows] == choices
    assert [row["position"] for row in rows] == list(range(study.trials_per_rater))
    assert all(0 <= row["rt_ms"] < 60_000 for row in rows), [row["rt_ms"] for row in rows]
    assert all(row["server_ms"] >= display_ms - 50 for row in rows), [row["server_ms"] for row in rows]
    assert rater["finished_at"] is not None and rater["completion_code"] == code and len(code) == 10


def _counts(db: str, study) -> dict:
    store = StudyDB(db, study)
    try:
        return store.counts()
    finally:
        store.close()


def test_sessions_start_only_by_invite_or_within_the_open_limit(created_study, chromium, tmp_path: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study, driver = created_study.study(), chromium
    wait = WebDriverWait(driver, 30, poll_frequency=0.05)
    db = f"sqlite:///{tmp_path}/answers.db"
    with serve(created_study.uri, db, tmp_path) as server:  # invite-only: the default
        driver.get(server.url + "/")
        message = driver.find_element(By.ID, "message")
        assert message.is_displayed() and "by invitation" in message.text
        assert not driver.find_element(By.ID, "start").is_enabled()
        driver.get(server.url + "/?invite=" + "n" * 24)
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
        assert "not valid" in driver.find_element(By.ID, "message").text
        assert driver.current_url.endswith("/?invite=" + "n" * 24)
    assert _counts(db, study)["sessions"] == 0

    db = f"sqlite:///{tmp_path}/open.db"
    with serve(created_study.uri, db, tmp_path, "--open", "--per-address", "1") as server:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.current_url.endswith("/trial"))
        driver.get(server.url + "/")  # Start again with the session's cookie: the same session
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.current_url.endswith("/trial"))
        driver.delete_all_cookies()  # a new session from the same address: over the limit
        driver.get(server.url + "/")
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.find_element(By.ID, "message").is_displayed())
        assert "Too many sessions" in driver.find_element(By.ID, "message").text
        assert driver.current_url == server.url + "/" and not driver.find_element(By.ID, "start").is_enabled()
        driver.get(server.url + "/?invite=" + invites(server, 1)[0])  # an invite is never limited
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.current_url.endswith("/trial"))
    assert _counts(db, study)["sessions"] == 2


LOADED_JS = """return performance.getEntriesByType('resource')
  .filter(function (e) { return e.initiatorType === 'img'; }).map(function (e) { return e.name; });"""
FETCH_JS = """var done = arguments[arguments.length - 1];
fetch(arguments[0], {credentials: 'same-origin', cache: 'no-store'})
  .then(function (r) { return r.arrayBuffer().then(function (b) { done([r.status, b.byteLength]); }); })
  .catch(function (e) { done([0, String(e)]); });"""


def test_a_reload_or_a_second_fetch_voids_the_trial_and_the_session_goes_on(created_study, chromium, tmp_path: Path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    study, driver = created_study.study(), chromium
    total = study.trials_per_rater
    wait = WebDriverWait(driver, 30, poll_frequency=0.02)
    db = f"sqlite:///{tmp_path}/answers.db"

    def shown(k: int) -> dict[str, str]:
        """Wait until trial k's images were on screen; the URLs the page loaded them from."""
        wait.until(lambda d: d.execute_script(
            "var l = window.studyLog; return l.length > 0 && l[l.length - 1].position") == k)
        assert driver.find_element(By.ID, "progress").text == f"Trial {k} of {total}"
        urls = driver.execute_script(LOADED_JS)[-3:]
        return {url.rsplit("/", 1)[1]: url for url in urls}

    def answer(key: str) -> None:
        wait.until(lambda d: d.find_element(By.ID, "stage").get_attribute("data-state") == "choosing")
        ActionChains(driver).send_keys(key).perform()

    with serve(created_study.uri, db, tmp_path) as server:
        driver.get(server.url + "/?invite=" + invites(server, 1)[0])
        driver.find_element(By.ID, "start").click()
        wait.until(lambda d: d.current_url.endswith("/trial"))
        driver.set_script_timeout(30)
        first = shown(1)
        assert sorted(first) == ["left", "lr", "right"]
        driver.refresh()  # trial 1's images came: it is void, and the reloaded page gets trial 2
        shown(2)
        assert driver.execute_async_script(FETCH_JS, first["left"])[0] == 404, "a void trial's images are gone"
        answer("f")
        third = shown(3)
        status, size = driver.execute_async_script(FETCH_JS, third["right"])  # a script in the page asks again
        assert status == 410 and size < 200, (status, size)  # sent once: no second copy
        answer("j")  # the answer to the void trial is refused (409), and the page goes on
        for k in range(4, total + 1):
            shown(k)
            answer("j")
        wait.until(lambda d: d.current_url.endswith("/thanks"))

    store = StudyDB(db, study)
    try:
        rows, void = store.export(), store.voided()
    finally:
        store.close()
    assert [(v["position"], v["reason"]) for v in void] == [(0, "reissued"), (2, "refetched")]
    assert [row["position"] for row in rows] == [1, 3, 4, 5], "answers of void trials are never counted"
