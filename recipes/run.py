"""Any system of Table 1 / Table 3: `accelerate launch recipes/run.py --system v2 [--config FILE]`."""

from trustser.recipe import main

if __name__ == "__main__":
    main()
