"""Benchmark 4: seconds per training step from a soft prompt (depth 0) to a deep perturbation (all layers).

    python bench/depth.py [--model gemma-3-270m] [--quick] [--depths 0,1,6,12,all] [--batch-size B]
"""

from _common import finish, parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--depths", help="comma-separated depths, numbers or 'all' (default 0,1,6,12,all)")
    p.add_argument("--batch-size", type=int, help="facts per step (default 16, or 4 with --quick)")
    args = p.parse_args()
    s = settings(args)
    depths = tuple(d if d == "all" else int(d) for d in args.depths.split(",")) if args.depths else s["depths"]
    lm = bench.load_bench_model(args.model)
    result = bench.depth(lm, relation=args.relation, depths=depths, batch_size=args.batch_size or s["depth_batch"],
                         repeats=s["repeats"], warmup=s["warmup"])
    finish(args, result)
