"""The frame gate on prompts it never saw, beside a wording-only baseline.

Trains the gate as the chooser does (the training family's pressured and no-pressure prompts with
reworded claims, the development families of ``FRAME_FAMILIES``, the ``fit`` part of context use,
claim recall and requests), once on everything and once with one context style left out, and
scores each on the held-out style fixtures, facts_opinion and the ``report`` part of the side
effects: the share of each kind of prompt it opens on, its accuracy, the wording baseline's, and
per set the AUROC of pressured against no-pressure prompts.

    .venv/bin/python bench/frame_gate.py [--leave-out fiction] [--out results/frame_gate.csv]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from behaviorlens import load_model
from behaviorlens.io import write_csv
from behaviorlens.prompts import load_family
from behaviorlens.reads import remembered_states
from behaviorlens.steering.candidates import FRAME_FAMILIES
from behaviorlens.steering.data import claim_wordings
from behaviorlens.steering.detectors import default_layers
from behaviorlens.steering.frame_gate import (
    context_prompts,
    family_prompts,
    frame_gate_quality,
    frame_prompts,
    request_prompts,
    train_frame_gate,
)
from behaviorlens.steering.judge import CHOICE_REQUESTS
from behaviorlens.steering.side_effects import SideEffectData

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
HELD = ("restated_varied", "pushback_cited_varied", "earlier_turn_varied", "system_claim_varied")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="capitals_opinion")
    ap.add_argument("--leave-out", default="fiction")
    ap.add_argument("--before", type=int, default=21, help="the gate reads a layer before this one")
    ap.add_argument("--out", default="results/frame_gate.csv")
    args = ap.parse_args()
    start = time.time()
    model = load_model()
    tok = model.tokenizer
    fit = SideEffectData(model, "fit", requests=CHOICE_REQUESTS)
    report = SideEffectData(model, "report", requests=CHOICE_REQUESTS)
    others = frame_prompts(model, fit, [f for f in FRAME_FAMILIES if f != args.family])
    train = family_prompts(load_family(args.family).render(tok), others, claim_wordings(), tok)
    held = {name: family_prompts(load_family(str(FIXTURES / f"{name}.yaml")).render(tok)) for name in HELD}
    held["facts_opinion"] = family_prompts(load_family("facts_opinion").render(tok))
    held["side effects (report part)"] = context_prompts(report.context, request_prompts(report.neutral))
    tables = []
    with remembered_states():
        for leave in ((), (args.leave_out,)):
            gate, cv = train_frame_gate(model, train, default_layers(model.sites.n_layers, args.before), 0, leave)
            table = frame_gate_quality(model, gate, train, held, leave)
            table.insert(0, "left_out", ",".join(leave) or "none")
            table.insert(1, "layer", gate.layer)
            tables.append(table)
            print(f"left out: {','.join(leave) or 'none'}; layer {gate.layer}; CV AUROC by layer "
                  f"{dict(zip(cv.layer, cv.cv_auroc.round(3)))}")
    out = pd.concat(tables, ignore_index=True)
    write_csv(args.out, out)
    pd.set_option("display.width", 250)
    print(out.to_string(index=False))
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
