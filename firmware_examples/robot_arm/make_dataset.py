"""The arm's command set as chat examples: varied phrasings, objects and places, a held-out test split.

    python make_dataset.py OUT_DIR      # writes OUT_DIR/train.jsonl and OUT_DIR/test.jsonl

Every example is {"messages": [system, user command, assistant action]} with the controller's own
system prompt and the action as the compact JSON that generation constrained by ACTION_SCHEMA
produces. The test split holds out whole phrasings and whole objects, so it measures whether the
model learnt the task, not the sentences. The same seed gives the same files.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from arm_controller import SYSTEM, action_json

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey"]
SHAPES = ["cube", "ball", "cylinder", "block", "box", "cup", "bottle", "gear", "ring", "cone"]
TOOLS = ["wrench", "screwdriver", "sensor", "battery", "hammer", "bolt", "spring", "valve"]
LOCATIONS = ["the shelf", "the table", "the left tray", "the right tray", "bin A", "bin B", "the conveyor",
             "the workbench", "the charging dock", "the blue box", "the top rack", "the loading zone"]

PHRASES = {  # per action: {o} an object, {l} a location; the last two of each are held out for the test
    "pick": ["Pick up the {o}", "Grab the {o}", "Take the {o}", "Lift the {o}", "Could you pick up the {o}?",
             "Please grab the {o}.", "Get me the {o}", "Pick the {o} up", "I need the {o}, pick it up",
             "Hold the {o}", "pick up {o}", "Fetch the {o} for me", "Can you get hold of the {o}?"],
    "place": ["Put the {o} on {l}", "Place the {o} in {l}", "Move the {o} to {l}", "Drop the {o} into {l}",
              "Set the {o} down on {l}", "Could you place the {o} on {l}?", "Carry the {o} over to {l}",
              "put {o} in {l}", "Bring the {o} to {l}, please", "Leave the {o} at {l}",
              "Transfer the {o} to {l}", "Stack the {o} on {l}"],
    "home": ["Return home", "Go home", "Go back to the home position", "Move to the start position",
             "Reset your position", "Return to base", "Park the arm", "Home position, please",
             "back to home", "Go to your resting position", "Retract to home"],
    "stop": ["Stop", "Halt all motion", "Stop now!", "Freeze", "Emergency stop", "Stop moving", "Abort",
             "Hold still", "Cancel everything and stop", "STOP", "Halt immediately", "Don't move"],
}
HELD_OUT_PHRASES = 2


def objects() -> tuple[list[str], list[str]]:
    """(train objects, held-out objects): every 5th coloured shape and two tools are never trained on."""
    every = [f"{c} {s}" for c in COLOURS for s in SHAPES] + TOOLS
    held = set(every[::5]) | {"valve", "spring"}
    return [o for o in every if o not in held], sorted(held)


def example(action: str, phrase: str, obj: str | None, loc: str | None, rng: random.Random) -> dict:
    command = phrase.format(o=obj, l=loc)
    if rng.random() < 0.15:
        command = command.lower()
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": command},
                         {"role": "assistant", "content": action_json(action, obj, loc)}]}


def split(phrases: list[str], objs: list[str], n: int, action: str, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        phrase = rng.choice(phrases)
        obj = rng.choice(objs) if action in ("pick", "place") else None
        loc = rng.choice(LOCATIONS) if action == "place" else None
        out.append(example(action, phrase, obj, loc, rng))
    return out


def make(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train_objs, test_objs = objects()
    train, test = [], []
    for action, phrases in PHRASES.items():
        seen, unseen = phrases[:-HELD_OUT_PHRASES], phrases[-HELD_OUT_PHRASES:]
        many = 40 if action in ("home", "stop") else 200
        train += split(seen, train_objs, many, action, rng)
        test += split(unseen, test_objs if action in ("pick", "place") else [None], 15, action, rng)
        test += split(seen, test_objs if action in ("pick", "place") else [None], 10, action, rng)
    rng.shuffle(train)
    return train, test


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
    out.mkdir(parents=True, exist_ok=True)
    train, test = make()
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out / name}.jsonl: {len(rows)} examples")


if __name__ == "__main__":
    main()
