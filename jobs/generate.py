"""Ray job: generate a sample data set (burn-in, thinning) as Parquet, optionally PNGs.

    ray job submit --working-dir . -- python jobs/generate.py --config gmm_sample --num-samples 10000 \
        --burn-in 500 --thin 5 --out runs/gmm_samples.parquet

Same flags as ``mmgm generate``; ``ray.init()`` joins the job's cluster when submitted.
"""
import sys

from mmgm_ray.pool.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("generate"))
