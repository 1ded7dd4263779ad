"""Ray job: `mmgm diagnose RUN` (same flags), e.g.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/diagnose.py /shared/runs/digits-samples --burn-in 50
"""
import sys

from mmgm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["diagnose", *sys.argv[1:]]))
