"""Ray job: `mmgm fid` (same flags), e.g.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/fid.py /shared/runs/main-samples --n 50000 --windows 3 --kid --json
"""
import sys

from mmgm_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["fid", *sys.argv[1:]]))
