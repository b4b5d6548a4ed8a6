"""Quality-lever ablation of GSRQ on SmolLM2 (see gsrq.eval.ablation).

    PYTHONPATH=python python benches/ablation.py --list
    PYTHONPATH=python nice -n 10 python benches/ablation.py --only "1b D64/M8,1b D64/M8 km" --markdown out.md
"""

import sys

from gsrq.eval.ablation import main

if __name__ == "__main__":
    sys.exit(main())
