"""One process of tests/test_eval_multihost.py's real 2-process evaluation:
``python tests/eval_2proc_driver.py COORDINATOR PROCESS_ID WORKDIR OUT_JSON``."""

import json
import os
import sys

import jax

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.dirname(TESTS)]  # the tests' helpers and the repo's configs/

if __name__ == "__main__":
    coordinator, pid, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator, num_processes=2, process_id=pid)
    from test_eval_multihost import panoptic_oracle_eval

    rep = panoptic_oracle_eval(workdir)
    with open(out, "w") as f:
        json.dump({"metrics": rep["metrics"], "baseline": rep["baseline"],
                   "num_examples": rep["num_examples"],
                   "processes": rep["settings"]["processes"]}, f)
