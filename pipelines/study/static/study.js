// The raters' pages: instructions (Start) and the trial loop. No inline script (the CSP forbids it).
// A trial: fetch /api/trial -> load its images while hidden -> show them all at once for
// data-display-ms -> hide them (src removed) -> accept one choice (buttons or keys) -> POST /api/answer.
// The server sends each image of a trial once: a pair that fails to load (or a reload after its
// images came) is void, and the page goes on to the next trial, saying so.
// window.studyLog keeps, per trial, when the images were shown and hidden (performance.now() ms).
"use strict";
(function () {
  const body = document.body;
  const log = (window.studyLog = []);
  const $ = (id) => document.getElementById(id);

  function message(text) {
    const box = $("message");
    box.textContent = text;
    box.hidden = false;
  }

  function post(url, data) {
    return fetch(url, {method: "POST", credentials: "same-origin", cache: "no-store",
                       headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)});
  }

  if (body.dataset.page === "instructions") {
    const invite = new URLSearchParams(location.search).get("invite");
    if (!invite && body.dataset.open !== "1") {
      message("This study is by invitation: please open the link you were sent.");
      $("start").disabled = true;
      return;
    }
    $("start").addEventListener("click", async () => {
      $("start").disabled = true;
      const response = await post("/api/session", invite ? {invite: invite} : {});
      if (response.ok) {
        location.assign("/trial");
      } else {
        message(response.status === 403 ? "This invitation is not valid or was used already."
                : response.status === 429 ? "Too many sessions were started from your network; please try again later."
                : "The study could not start; please reload the page.");
        $("start").disabled = response.status === 429;
      }
    });
    return;
  }
  if (body.dataset.page !== "trial") return;

  const displayMs = Number(body.dataset.displayMs);
  const slots = body.dataset.task === "1" ? ["left", "lr", "right"] : ["left", "right"];
  if (body.dataset.task !== "1") $("img-lr").parentElement.hidden = true;
  const stage = $("stage");
  const buttons = {left: $("choose-left"), right: $("choose-right")};
  let current = null;
  let accepting = false;
  let promptAt = 0;
  let failures = 0;  // pairs in a row that could not be shown

  function hideImages() {
    for (const slot of slots) {
      const img = $("img-" + slot);
      img.style.visibility = "hidden";
      img.removeAttribute("src");
    }
  }

  function enable(on) {
    accepting = on;
    buttons.left.disabled = buttons.right.disabled = !on;
  }

  function load(img, url) {
    return new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = reject;
      img.src = url;
    });
  }

  async function next() {
    stage.dataset.state = "loading";
    enable(false);
    hideImages();
    const response = await fetch("/api/trial", {credentials: "same-origin", cache: "no-store"});
    if (response.status === 401) { location.assign("/"); return; }
    if (!response.ok) { message("The next trial could not be loaded; please reload the page."); return; }
    const trial = await response.json();
    if (trial.done) { location.assign("/thanks"); return; }
    current = trial;
    $("progress").textContent = "Trial " + trial.position + " of " + trial.total;
    $("bar").style.width = (100 * (trial.position - 1) / trial.total) + "%";
    $("prompt").textContent = "Look at the images.";
    const images = slots.map((slot) => $("img-" + slot));
    try {
      await Promise.all(slots.map((slot, i) => load(images[i], trial.images[slot])));
    } catch (error) {
      hideImages();
      failures += 1;
      if (failures >= 3) {
        message("The images could not be loaded; please reload the page.");
        return;
      }
      message("A pair of images could not be shown; it is skipped.");
      setTimeout(next, 1000);  // the server voids this trial when asked for the next one
      return;
    }
    failures = 0;
    $("message").hidden = true;
    requestAnimationFrame(() => {
      for (const img of images) img.style.visibility = "visible";
      stage.dataset.state = "showing";
      const entry = {position: trial.position, shown: performance.now()};
      log.push(entry);
      setTimeout(() => {
        hideImages();
        entry.hidden = performance.now();
        stage.dataset.state = "choosing";
        $("prompt").textContent = $("question").textContent;
        promptAt = performance.now();
        enable(true);
      }, displayMs);
    });
  }

  async function choose(side) {
    if (!accepting) return;
    enable(false);
    const rt = Math.round(performance.now() - promptAt);
    const entry = log[log.length - 1];
    entry.choice = side;
    entry.rt = rt;
    const response = await post("/api/answer", {trial: current.trial, choice: side, rt_ms: rt});
    if (!response.ok && response.status !== 409) {
      message("Your answer could not be saved; please reload the page.");
      return;
    }
    next();
  }

  buttons.left.addEventListener("click", () => choose("left"));
  buttons.right.addEventListener("click", () => choose("right"));
  document.addEventListener("keydown", (event) => {
    if (event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
    const key = event.key.toLowerCase();
    if (key === "arrowleft" || key === "f") choose("left");
    if (key === "arrowright" || key === "j") choose("right");
  });
  next();
})();
