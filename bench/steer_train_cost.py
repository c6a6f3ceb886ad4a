"""What choosing an edit costs, in unedited passes over the sets it judges on, in one run.

Times one unedited pass (the judging pairs of the training family on every side, plus the
select half of the side effects the chooser's limits read: neutral requests, factual control,
context use) and then ``choose_edit`` with the given candidate groups, and prints their ratio.
Target (issue 22): ``steer train`` with every candidate in at most 8 minutes on 2 cores.

    .venv/bin/python bench/steer_train_cost.py --from-patching results/sycophancy/patch/heads \
        results/sycophancy/patch/resid [--candidates knockout "narrowed knockout"] [--without-reuse] [--table T.csv]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import behaviorlens.steering.choose as choose_module
from behaviorlens import load_model
from behaviorlens.patching.results import evidence_of, patch_runs
from behaviorlens.prompts import load_family
from behaviorlens.steering.candidates import GROUPS
from behaviorlens.steering.choose import choose_edit, split_for_choice
from behaviorlens.steering.evaluate import observe
from behaviorlens.steering.judge import CHOICE_REQUESTS, light_side_effects
from behaviorlens.steering.side_effects import SideEffectData


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="capitals_opinion")
    ap.add_argument("--from-patching", nargs="+", required=True, metavar="DIR")
    ap.add_argument("--candidates", nargs="+", default=list(GROUPS))
    ap.add_argument("--refits", type=int, default=2)
    ap.add_argument("--without-reuse", action="store_true",
                    help="edited forwards recompute every column (the cost before kv_cache); --table writes the "
                         "candidate table to compare the two runs' figures")
    ap.add_argument("--table", help="write the candidate table here (CSV)")
    args = ap.parse_args()
    if args.without_reuse:
        choose_module.reusing_unedited = nullcontext
    model = load_model()
    cset = load_family(args.family).render(model.tokenizer)
    evidence = evidence_of(patch_runs(args.from_patching))
    start = time.perf_counter()
    data = SideEffectData(model, "select", requests=CHOICE_REQUESTS)
    prepare = time.perf_counter() - start
    _, held, _ = split_for_choice(cset, evidence.rows)
    start = time.perf_counter()
    observe(model, held, None)
    light_side_effects(model, data, None)
    unedited = time.perf_counter() - start
    start = time.perf_counter()
    choice = choose_edit(model, cset, evidence, groups=args.candidates, side_effects=data, refits=args.refits,
                         outside_limits=True)
    total = time.perf_counter() - start
    if args.table:
        choice.candidates.to_csv(args.table, index=False)
    print(f"side-effect data (greedy continuations, tokenizing): {prepare:.1f} s")
    print(f"one unedited pass (judging pairs + select half of side effects): {unedited:.1f} s")
    print(f"choose_edit, {len(choice.candidates)} candidates of {len(args.candidates)} groups, {args.refits} refits: "
          f"{total:.1f} s = {total / unedited:.0f} unedited passes; with the data: {(total + prepare) / 60:.1f} min")


if __name__ == "__main__":
    main()
