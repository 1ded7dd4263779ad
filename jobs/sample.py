"""Ray job: launch (or resume) a sampling run on the chain pool.

    ray job submit --working-dir . -- python jobs/sample.py --config gmm_sample --set pool.num_steps=2000
    python jobs/sample.py --resume runs/gmm_sample          # local: starts a Ray instance

Same flags as ``mmgm sample``; ``ray.init()`` joins the job's cluster when submitted.
"""
import sys

from mmgm_ray.pool.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("sample"))
