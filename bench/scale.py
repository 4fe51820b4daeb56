"""Benchmark 5: evaluation facts/s and peak memory at several batch sizes, to size a run.

Batch sizes run in ascending order in this one process (run_all gives them a fresh subprocess).

    python bench/scale.py [--model gemma-3-270m] [--quick] [--batch-sizes 1,4,16,64,256] [--facts N]
"""

from _common import finish, parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", help="comma-separated (default 1,4,16,64,256, or 1,4,16 with --quick)")
    p.add_argument("--facts", type=int, help="facts per batch size, at least the batch size (default 128, or 16 with --quick)")
    args = p.parse_args()
    s = settings(args)
    sizes = tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else s["scale_sizes"]
    lm = bench.load_bench_model(args.model)
    result = bench.scale(lm, relation=args.relation, batch_sizes=sizes, min_facts=args.facts or s["scale_facts"],
                         repeats=s["repeats"], warmup=s["warmup"])
    finish(args, result)
