"""The study's pure parts: the trial plan's balance rules, the statistics against hand-computed
values, the one-encoding rule for stored images, the served images' jitter, how a request's client
address and scheme are read behind proxies, and the web app's imports (no torch/Ray/MLflow)."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipelines.study import images as I
from pipelines.study.access import Access
from pipelines.study.plan import Protocol, make_plan
from pipelines.study.stats import bootstrap_raters, fool_rates, wilson

MODELS = ["m0", "m1", "m2"]


def test_plan_keeps_the_protocol_balanced():
    protocol = Protocol(task=1, images=12, per_rater=6, catch=2, raters=12, display_seconds=3, seed=4)
    plans = make_plan(protocol, MODELS)
    assert len(plans) == 12 and all(len(plan) == 6 + 2 for plan in plans)
    seen: Counter[int] = Counter()
    by_image_models: dict[int, set] = {}
    for plan in plans:
        images = [t["image"] for t in plan]
        assert len(set(images)) == len(images), "a rater sees each source image at most once"
        catch = [t for t in plan if t["model"] is None]
        assert sorted(t["image"] for t in catch) == [12, 13], "every rater gets both catch images"
        assert all(t["image"] < 12 for t in plan if t["model"] is not None), "catch images are never test images"
        assert max(Counter(t["model"] for t in plan if t["model"]).values()) == 2, "each model twice per rater"
        for model in [*MODELS, None]:
            sides = Counter(t["real"] for t in plan if t["model"] == model)
            assert abs(sides["left"] - sides["right"]) <= 1, f"real photo side unbalanced for {model}: {sides}"
        for t in plan:
            if t["model"] is not None:
                seen[t["image"]] += 1
                by_image_models.setdefault(t["image"], set()).add(t["model"])
    assert set(seen.values()) == {6}, "every test image is seen equally often"
    assert all(models == set(MODELS) for models in by_image_models.values()), "each image meets every model"
    assert all(Counter(t["real"] for plan in plans for t in plan).values())
    assert make_plan(protocol, MODELS) == plans
    other = make_plan(Protocol(1, 12, 6, 2, 12, 3, seed=5), MODELS)
    assert other != plans and [t["image"] for t in other[0]] != [t["image"] for t in plans[0]]


@pytest.mark.parametrize("changes, message", [
    ({"task": 3}, "--task"), ({"per_rater": 11, "images": 10}, "--per-rater"), ({"catch": -1}, "--catch"),
    ({"display_seconds": 0}, "--display-seconds"), ({"images": 9, "catch": 2, "per_rater": 5}, "need 11"),
])
def test_protocol_rejects_impossible_settings(changes, message):
    protocol = Protocol(**{"images": 10, "per_rater": 5, **changes})
    with pytest.raises(ValueError, match=message):
        protocol.check(models=2, available=10)


def test_wilson_interval_matches_hand_computed_values():
    low, high = wilson(5, 10)
    assert (low, high) == (pytest.approx(0.236593, abs=1e-6), pytest.approx(0.763407, abs=1e-6))
    assert wilson(0, 10) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.277533, abs=1e-6))
    assert wilson(10, 10) == (pytest.approx(0.722467, abs=1e-6), pytest.approx(1.0, abs=1e-12))
    assert wilson(0, 0) == (0.0, 1.0)


def test_bootstrap_over_raters_sees_rater_differences_that_wilson_cannot():
    same = bootstrap_raters([5] * 20, [10] * 20)
    assert same == (pytest.approx(0.5), pytest.approx(0.5)), "identical raters: no spread"
    split = bootstrap_raters([0] * 10 + [10] * 10, [10] * 20, resamples=4000, seed=1)
    w_low, w_high = wilson(100, 200)
    assert split[0] < 0.5 < split[1]
    assert split[1] - split[0] > 2 * (w_high - w_low), (split, (w_low, w_high))
    assert bootstrap_raters([0] * 10 + [10] * 10, [10] * 20, resamples=4000, seed=1) == split  # seeded


def _row(rater, model, picked, image=0, finished=1.0):
    return {"rater": rater, "slot": rater, "model": model, "picked": picked, "image": image, "rt_ms": 100 * rater,
            "finished_at": finished}


def test_fool_rates_count_model_picks_and_drop_raters_who_miss_catch_trials():
    models = {"m0": {"label": "sr3", "uri": "u0"}, "m1": {"label": "bicubic", "uri": "bicubic"}}
    rows = [_row(1, "m0", "model", 0), _row(1, "m0", "real", 1), _row(1, "m1", "real", 0), _row(1, None, "real"),
            _row(2, "m0", "model", 0), _row(2, "m1", "model", 1), _row(2, None, "real"), _row(2, None, "real"),
            _row(3, "m0", "model", 1, None), _row(3, "m1", "model", 0, None), _row(3, None, "degraded", 0, None)]
    found = fool_rates(rows, models, resamples=200)
    assert found["excluded"] == [{"rater": 3, "slot": 3, "catch_answered": 1, "catch_missed": 1}]
    m0, m1 = found["models"]["m0"], found["models"]["m1"]
    assert (m0["fooled"], m0["trials"], m0["raters"]) == (2, 3, 2) and m0["fool_rate"] == pytest.approx(2 / 3)
    assert (m1["fooled"], m1["trials"]) == (1, 2)
    assert m0["wilson95"] == list(wilson(2, 3))
    assert [(e["image"], e["fooled"], e["trials"]) for e in m0["images"]] == [(0, 2, 2), (1, 0, 1)]
    assert found["raters"] == {"answered": 3, "finished": 2, "included": 2}
    lenient = fool_rates(rows, models, max_catch_misses=1, resamples=200)
    assert lenient["excluded"] == [] and lenient["models"]["m0"]["trials"] == 4


def _chunks(png: bytes) -> list[str]:
    names, at = [], 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        names.append(kind.decode())
        at += 12 + length
    return names


def test_every_served_image_has_one_encoding_whose_size_tells_nothing():
    rng = np.random.default_rng(0)
    photo_like = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 128, np.uint8)
    encoded = [I.encode(photo_like), I.encode(flat), I.encode(I.degrade(photo_like))]
    assert len({len(e) for e in encoded}) == 1, "same size → same byte length, whatever the content"
    assert all(_chunks(e) == ["IHDR", "IDAT", "IEND"] for e in encoded), "no metadata chunks"
    assert np.array_equal(I.decode(encoded[0]), photo_like)
    blocks = I.degrade(photo_like)
    assert len(np.unique(blocks.reshape(-1, 3), axis=0)) <= (64 // I.CATCH_FACTOR) ** 2 < 64 * 64 // 10
    names = {I.opaque_name() for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("images/") and len(n) == len("images/") + 32 + 4 for n in names)


def test_the_web_app_imports_no_torch_ray_or_mlflow():
    code = ("import sys, pipelines.study.app, pipelines.study.results, pipelines.study.stats; "
            "print([m for m in ('torch', 'ray', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_jitter_changes_every_value_by_at_most_one_level_and_never_repeats():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    photo[0, :4] = [0, 0, 0], [255, 255, 255], [0, 255, 0], [255, 0, 255]  # the clipped ends
    served = [I.served_png(photo) for _ in range(50)]
    assert len(set(served)) == 50 and len({len(s) for s in served}) == 1 == len({len(served[0]), len(I.encode(photo))})
    for data in served:
        change = I.pixels(data).astype(np.int16) - photo
        assert set(np.unique(change)) <= {-1, 0, 1} and np.count_nonzero(change) > 0.5 * change.size
    masked = {(I.pixels(d) >> 1).tobytes() for d in served}
    assert len(masked) == 50, "no exact rule (here: the low bit dropped) recovers a common key"
    assert np.array_equal(I.jitter(photo, np.random.default_rng(7)), I.jitter(photo, np.random.default_rng(7)))


@pytest.mark.parametrize("peer, forwarded, trusted, expected", [
    ("203.0.113.9", [], (), "203.0.113.9"),
    ("203.0.113.9", ["198.51.100.1"], (), "203.0.113.9"),  # headers from an untrusted peer: ignored
    ("127.0.0.1", ["198.51.100.1"], (), "127.0.0.1"),  # no trusted proxies: ignored
    ("127.0.0.1", ["198.51.100.1"], ("127.0.0.1",), "198.51.100.1"),
    ("127.0.0.1", ["6.6.6.6, 198.51.100.1"], ("127.0.0.1",), "198.51.100.1"),  # client-written entries: ignored
    ("127.0.0.1", ["6.6.6.6", "198.51.100.1"], ("127.0.0.1",), "198.51.100.1"),  # the header repeated
    ("10.1.2.3", ["198.51.100.1, 10.9.9.9"], ("10.0.0.0/8",), "198.51.100.1"),  # trusted hops skipped
    ("10.1.2.3", ["10.4.4.4"], ("10.0.0.0/8",), "10.4.4.4"),  # all trusted: the leftmost
    ("10.1.2.3", ["198.51.100.1, garbage"], ("10.0.0.0/8",), "10.1.2.3"),  # a broken hop: stop at the proxy
    ("10.1.2.3", ["198.51.100.1:4431"], ("10.0.0.0/8",), "198.51.100.1"),
    ("::1", ["2001:db8:1:2:3:4:5:6"], ("::1",), "2001:db8:1:2::/64"),
    ("::1", ['"[2001:db8:1:2::9]:443"'], ("::1/128",), "2001:db8:1:2::/64"),
    ("::ffff:10.0.0.1", ["198.51.100.1"], ("10.0.0.0/8",), "198.51.100.1"),  # IPv4-mapped peer
    (None, ["198.51.100.1"], ("127.0.0.1",), "unknown"),
])
def test_the_client_address_is_the_rightmost_one_no_trusted_proxy_wrote(peer, forwarded, trusted, expected):
    assert Access(trusted_proxies=trusted).client_address(peer, forwarded) == expected


def test_https_is_believed_only_from_a_trusted_proxy():
    proxied, direct = Access(trusted_proxies=("127.0.0.1",)), Access()
    assert proxied.https("http", "127.0.0.1", ["https"]) and not direct.https("http", "127.0.0.1", ["https"])
    assert not proxied.https("http", "203.0.113.9", ["https"]) and direct.https("https", "203.0.113.9", [])
    assert not proxied.https("http", "127.0.0.1", ["https, http"]) and proxied.https("http", "127.0.0.1", ["http, https"])
    assert Access(secure=True).cookie_secure("http", "203.0.113.9", [])
    for bad in ({"per_address": 0}, {"trusted_proxies": ("10.0.0.300/8",)}, {"window_s": 0}):
        with pytest.raises(ValueError):
            Access(**bad)


def test_serve_refuses_a_bad_proxy_or_limit_in_one_line(capsys, tmp_path):
    from job_support import load_job

    job = load_job("study")
    for flags, said in ((["--trusted-proxy", "10.0.0.300/8"], "--trusted-proxy '10.0.0.300/8'"),
                        (["--open", "--per-address", "0"], "--per-address 0")):
        assert job.main(["serve", "--study", str(tmp_path / "none"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("study: error: ") and said in err[0], err
    with pytest.raises(SystemExit):
        job.main(["serve", "--study", str(tmp_path), "--open", "--invite-only"])
