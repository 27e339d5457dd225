"""Writes SST-2/train.tsv and SST-2/dev.tsv here: a small synthetic SST-2 in the GLUE layout.

The sentences are made up from templates (movie-review phrases with a positive or negative
verdict, some with a "but" that turns it), so 02_glue_finetune.ipynb runs offline. They are
not SST-2's sentences and the accuracy on them says nothing about SST-2. Deterministic:
`python notebooks/glue_sample/generate.py` rewrites the same files.
"""

from __future__ import annotations

import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the soundtrack",
            "the ending", "the cast", "the story", "the direction", "the dialogue",
            "the cinematography", "the lead performance", "the sequel", "the whole thing"]
POSITIVE = ["wonderful", "moving", "charming", "funny", "gripping", "beautiful", "clever",
            "delightful", "brilliant", "heartfelt", "thrilling", "warm", "sharp", "engaging"]
NEGATIVE = ["dull", "boring", "clumsy", "tedious", "flat", "predictable", "lifeless", "silly",
            "awful", "bland", "messy", "tiresome", "shallow", "forgettable"]
INTENSIFIERS = ["", "", "really ", "truly ", "often ", "surprisingly ", "utterly ", "rather "]
VERBS = ["is", "feels", "seems", "turns out", "remains"]
ENDINGS = [" .", " .", " !", " , from start to finish .", " for most of its running time ."]


def clause(rng: random.Random, positive: bool) -> str:
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    verb = rng.choice(VERBS)
    verb = f"{verb} to be" if verb == "turns out" else verb
    return f"{rng.choice(SUBJECTS)} {verb} {rng.choice(INTENSIFIERS)}{adjective}"


def sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    if rng.random() < 0.3:  # "<other verdict> , but <verdict>": the second clause decides
        text = f"{clause(rng, not label)} , but {clause(rng, bool(label))}"
    elif rng.random() < 0.5:
        text = f"{clause(rng, bool(label))} and {clause(rng, bool(label))}"
    else:
        text = clause(rng, bool(label))
    return text + rng.choice(ENDINGS) + " ", label


def write(path: str, rows: list[tuple[str, int]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write("sentence\tlabel\n")
        handle.writelines(f"{text}\t{label}\n" for text, label in rows)


def main() -> None:
    rng = random.Random(2)
    seen: set[str] = set()
    rows = []
    while len(rows) < 600:
        text, label = sentence(rng)
        if text not in seen:  # no dev sentence is also a train sentence
            seen.add(text)
            rows.append((text, label))
    write(os.path.join(HERE, "SST-2", "train.tsv"), rows[:480])
    write(os.path.join(HERE, "SST-2", "dev.tsv"), rows[480:])


if __name__ == "__main__":
    main()
