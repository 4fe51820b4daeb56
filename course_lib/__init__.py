"""course_lib: the library under the book that rebuilds Qin & Eisner (2021), "Learning How to Ask".

Where things live:
    data          facts, relations, prompt sets (and where the files are)
    templates     cloze templates "[X] ... [Y]" and their pieces
    cloze         ClozeLM: one interface over masked, seq2seq and causal LMs; the blank's scores
    models        the model registry and loading (offline Gemma from a pip package, hub models)
    evaluation    P@1 / P@10 / MRR, answer spaces, counts of facts kept and dropped
    probing       hard prompts: LAMA, LPAQA, best-on-dev, ensembles
    soft_prompts  the offset tensor: soft prompts and deep perturbations, random initialisation
    mixture       mixtures of prompts, EM, data-dependent weights
    training      the tuning loop: early stopping, checkpoints, resume
    experiments   the method ladder and the paper grid; the results cache
    results       results tables: rows with their identity, checksummed CSVs, merging, summaries
    statistics    paired differences of two methods on the same facts, bootstrap intervals, seeds
    files         atomic writes, a lock for files several processes update, output-path checks
    cli           the command line (python -m course_lib)
"""

__version__ = "0.1.0"
