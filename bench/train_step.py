"""Benchmark 2: one prompt-tuning step, ours (gold_log_probs + Adam) vs PEFT prompt tuning, steps/s and peak memory.

Each variant runs in its own worker process (PEFT modifies the model it wraps; memory stays apart);
the parent has them take turns, one step each.

    python bench/train_step.py [--model gemma-3-270m] [--quick] [--batch-size 16] [--steps N] [--threads N]
"""

from _common import finish, parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, help="facts per step (default 16)")
    p.add_argument("--steps", type=int, help="timed steps per subprocess (default 5, or 2 with --quick)")
    args = p.parse_args()
    s = settings(args)
    result = bench.train_step(args.model, relation=args.relation, batch_size=args.batch_size or s["train_batch"],
                              steps=args.steps or s["train_steps"], warmup=s["warmup"])
    finish(args, result)
