"""Benchmark 3: seconds per training epoch for a mixture of K prompts, against K x one prompt's.

    python bench/mixtures.py [--model gemma-3-270m] [--quick] [--ks 1,5,10,30] [--facts N] [--batch-size B]
"""

from _common import finish, parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ks", help="comma-separated K values (default 1,5,10,30)")
    p.add_argument("--prompt-set", default=bench.MIXTURE_PROMPT_SET, help=f"where the K templates come from (default {bench.MIXTURE_PROMPT_SET})")
    p.add_argument("--facts", type=int, help="training facts per epoch (default 16, or 2 with --quick)")
    p.add_argument("--batch-size", type=int, help="facts per step (default 16, or 2 with --quick)")
    args = p.parse_args()
    s = settings(args)
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else s["mix_ks"]
    lm = bench.load_bench_model(args.model)
    result = bench.mixtures(lm, relation=args.relation, prompt_set=args.prompt_set, ks=ks, n_facts=args.facts or s["mix_facts"],
                            batch_size=args.batch_size or s["mix_batch"], repeats=s["repeats"], warmup=s.get("mix_warmup", s["warmup"]))
    finish(args, result)
