"""Benchmark 1: evaluation facts/s, score_facts vs a naive loop (and the fill-mask pipeline for masked LMs).

    python bench/eval_throughput.py [--model gemma-3-270m] [--quick] [--facts N] [--batch-size B]
    python bench/eval_throughput.py --model bert-base-random     # adds transformers' pipeline('fill-mask')
    python bench/eval_throughput.py --compile                    # adds ours through torch.compile
"""

from _common import finish, parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, help="facts scored per repeat (default 256, or 16 with --quick)")
    p.add_argument("--batch-size", type=int, help="score_facts batch size (default 32)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive loop (slow on large models)")
    p.add_argument("--compile", action="store_true", help="add ours through torch.compile (compiling takes minutes on a CPU)")
    args = p.parse_args()
    s = settings(args)
    lm = bench.load_bench_model(args.model)
    result = bench.eval_throughput(lm, relation=args.relation, n_facts=args.facts or s["eval_facts"], batch_size=args.batch_size or s["eval_batch"],
                                   repeats=s["repeats"], warmup=s["warmup"], naive=not args.no_naive, matmul_sizes=s["matmul_sizes"],
                                   compile=args.compile)
    if "compile_s" in result:
        print(f"torch.compile: the first call (compiling) took {result['compile_s']:.1f} s")
    print("\nwhere ours spends its time:")
    for part, share in sorted(result["breakdown"]["fractions"].items(), key=lambda kv: -kv[1]):
        print(f"  {share:6.1%}  {part}")
    finish(args, result)
