"""The 2AFC protocol and its plan: which rater slot sees which image, against which model, on which side.

The paper's protocol (SR3 §4.3) is the default: Task 1 shows the LR input between two HR images
(the real photo and a model's output) and asks "Which of the two images is a better high quality
version of the low resolution image in the middle?"; Task 2 shows the two HR images alone and asks
"Which image would you guess is from a camera?". Images are shown for `display_seconds` (3 s),
then hidden, then the rater chooses. 100 test images, 50 per rater.

Plan (`make_plan`, deterministic in the seed), for rater slot r of R planned slots:

- test images: a window of `per_rater` consecutive images of one seeded permutation, starting at
  r·per_rater mod N, so every image is seen equally often and a rater sees each image at most once;
- models: the image at window position j is paired with model (j + ⌊r·per_rater / N⌋) mod M, so each
  rater sees every model equally often (±1) and an image moves to the next model each time the
  windows come round to it again;
- sides: within each (rater, model) group and among the catch trials, the real photo is left in
  half of the trials (±1), the order shuffled;
- catch trials: `catch` extra images, never test images, each shown as the real photo against a
  heavily degraded copy; every rater sees all of them (so each source image at most once still holds);
- the trials of a slot are shuffled. Slot r ≥ R reuses the plan of slot r mod R.

`study.json` (written last by `create`, read by `serve` and `results`) holds the protocol, the
models (id → label, URI, registry name and version, how they were sampled), the images (source key,
file names of the real HR, the LR, each model's output and the degraded catch copy) and the plan.
Trial entries: {"image": i, "model": "m0" | null (catch), "real": "left" | "right"}.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from pipelines import storage

STUDY_FILE = "study.json"
IMAGES_DIR = "images"
FORMAT_VERSION = 1
QUESTIONS = {
    1: "Which of the two images is a better high quality version of the low resolution image in the middle?",
    2: "Which image would you guess is from a camera?",
}
SIDES = ("left", "right")
_NAME = re.compile(r"^images/[0-9a-f]{32}\.png$")


@dataclass(frozen=True)
class Protocol:
    """What a rater is shown; the defaults are the paper's."""

    task: int = 1
    images: int = 100
    per_rater: int = 50
    catch: int = 3
    raters: int = 50  # planned slots; more raters reuse the plan round-robin
    display_seconds: float = 3.0
    seed: int = 0

    def check(self, models: int, available: int | None = None) -> None:
        if self.task not in QUESTIONS:
            raise ValueError(f"--task {self.task}: choose 1 (LR shown) or 2 (no LR)")
        if models < 1:
            raise ValueError("a study needs at least one model or baseline")
        if not 1 <= self.per_rater <= self.images:
            raise ValueError(f"--per-rater {self.per_rater}: need 1 ≤ per-rater ≤ --images {self.images}")
        if self.catch < 0 or self.raters < 1:
            raise ValueError("--catch must be ≥ 0 and --raters ≥ 1")
        if not 0.1 <= self.display_seconds <= 60:
            raise ValueError(f"--display-seconds {self.display_seconds}: choose between 0.1 and 60")
        if available is not None and self.images + self.catch > available:
            raise ValueError(f"the pairs' val split has {available} pairs; --images {self.images} + --catch "
                             f"{self.catch} need {self.images + self.catch} (catch images are never test images)")


def make_plan(protocol: Protocol, model_ids: list[str]) -> list[list[dict[str, Any]]]:
    """The trial lists of the planned rater slots (see the module docstring)."""
    p, m = protocol, len(model_ids)
    rng = random.Random(p.seed)
    order = list(range(p.images))
    rng.shuffle(order)
    plans = []
    for slot in range(p.raters):
        start, shift = (slot * p.per_rater) % p.images, (slot * p.per_rater) // p.images
        groups: dict[str | None, list[int]] = {}
        for j in range(p.per_rater):
            groups.setdefault(model_ids[(j + shift) % m], []).append(order[(start + j) % p.images])
        groups[None] = list(range(p.images, p.images + p.catch))  # catch images follow the test images
        trials = []
        for model, images in groups.items():
            first = rng.randrange(2)  # which side gets the extra trial of an odd group
            sides = [SIDES[(k + first) % 2] for k in range(len(images))]
            rng.shuffle(sides)
            trials += [{"image": i, "model": model, "real": side} for i, side in zip(images, sides)]
        rng.shuffle(trials)
        plans.append(trials)
    return plans


@dataclass
class Study:
    """A created study, as read from `STUDY/study.json`."""

    uri: str
    doc: dict[str, Any] = field(repr=False)

    @classmethod
    def load(cls, uri: str) -> Study:
        target = storage.join(uri, STUDY_FILE)
        if not storage.exists(target):
            raise FileNotFoundError(f"{uri}: no {STUDY_FILE} (create the study with jobs/study.py create)")
        doc = json.loads(storage.read_bytes(target))
        if doc.get("format") != FORMAT_VERSION:
            raise ValueError(f"{target}: format {doc.get('format')!r}, this code reads {FORMAT_VERSION}")
        study = cls(uri, doc)
        study.check_names()
        return study

    @property
    def id(self) -> str:
        return self.doc["study_id"]

    @property
    def task(self) -> int:
        return int(self.doc["protocol"]["task"])

    @property
    def question(self) -> str:
        return QUESTIONS[self.task]

    @property
    def display_seconds(self) -> float:
        return float(self.doc["protocol"]["display_seconds"])

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.doc["models"]

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.doc["images"]

    def slot_plan(self, slot: int) -> list[dict[str, Any]]:
        plans = self.doc["plan"]
        return plans[slot % len(plans)]

    @property
    def trials_per_rater(self) -> int:
        return len(self.doc["plan"][0])

    def files(self, trial: dict[str, Any]) -> dict[str, str]:
        """Relative file names of one trial: {"left", "right", "lr"}; the server's secret."""
        image = self.images[trial["image"]]
        other = image["degraded"] if trial["model"] is None else image["outputs"][trial["model"]]
        left, right = (image["real"], other) if trial["real"] == "left" else (other, image["real"])
        return {"left": left, "right": right, "lr": image["lr"]}

    def all_names(self) -> set[str]:
        names = set()
        for image in self.images:
            names |= {image["real"], image["lr"], *image["outputs"].values()}
            names |= {image["degraded"]} if image.get("degraded") else set()
        return names

    def check_names(self) -> None:
        """Every image name is `images/<32 hex>.png`: nothing a served name can do leaves the study."""
        bad = sorted(name for name in self.all_names() if not _NAME.match(name))
        if bad:
            raise ValueError(f"{self.uri}/{STUDY_FILE}: unexpected image names {bad[:3]}")
