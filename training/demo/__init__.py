"""The demo: its task and model, the whole-loop harness with simulated people, and the local process stack.

`make demo` and `make loop` run on what is here: the arithmetic task
(`task`), the small offline model trained on it (`model`), the harness that
drives the real app through its API with simulated labelers and evaluators
(`loop`, `label_efficiency`), the demo task's true scorer for RL runs
(`truth`), and the processes `rundemo` and `simulate_loop` start on one
machine (`stack`). Production code never imports this package
(tests/test_import_boundary.py); demo commands and tests do.
"""
