"""All five benchmarks and the report, like `python -m course_lib bench`, for any model.

    python bench/run_all.py [--model gemma-3-270m] [--masked-model bert-base-random|none] [--quick] [--out _build/bench]
"""

from _common import parser, settings

from course_lib import bench

if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--masked-model", default=bench.MASKED_STANDIN, help="masked LM for the fill-mask pipeline comparison ('none' to skip)")
    p.add_argument("--out", default="_build/bench")
    args = p.parse_args()
    settings(args)  # applies --threads
    if args.repeats:
        p.error("run_all takes its repeats from --quick; use the single-benchmark scripts for --repeats")
    print(bench.run_all(args.out, quick=args.quick, model=args.model, relation=args.relation,
                        masked_model=None if args.masked_model == "none" else args.masked_model))
