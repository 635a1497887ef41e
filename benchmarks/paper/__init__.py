"""The paper reproduction harness: `relay-llm bench paper --preset quick|full [--out docs/results]`.

Answers the RelayCaching paper's four questions on relay-llm (Q1 quality, Q2 efficiency, Q3 ablation, Q4
sensitivity) with every method run by the same executor, and writes docs/results/README.md (tables, PNG
plots, the command, the machine) with the raw per-item JSON beside it. Modules, one idea each:

* tasks: `facts` (fact relay), `coding` (HumanEval code relay), `notes` (chain of notes), `longctx`
* `scoring` (exact match, intervals), `execute` (the pass@1 subprocess executor)
* `methods` (the methods and one measurement of all of them on a prompt), `peers` (HF generate, llama.cpp)
* `presets`, `records` (resumable records, progress with ETA), `run` (the run), `tables`, `plots`, `page`
"""
