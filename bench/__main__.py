"""``python -m bench``: the end-to-end benchmark (GPU when present, else a small CPU run)."""
from bench.e2e import main

if __name__ == "__main__":
    main()
