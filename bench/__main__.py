"""``python -m bench``: the end-to-end benchmark (GPU when present, else a small CPU run).

``python -m bench aot ...`` runs the AOT compile gate (bench/aot.py) and
``python -m bench roofline ...`` the predicted roofline (bench/roofline.py) instead.
"""
import sys

from bench.e2e import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["aot"]:
        from bench.aot import main as aot_main
        sys.exit(aot_main(sys.argv[2:]))
    elif sys.argv[1:2] == ["roofline"]:
        from bench.roofline import main as roofline_main
        sys.exit(roofline_main(sys.argv[2:]))
    else:
        main()
