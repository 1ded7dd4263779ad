"""Ray job: `mmgm compare` (same flags), e.g.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/compare.py --config digits_compare --set output=/shared/runs
"""
import sys

from mmgm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
