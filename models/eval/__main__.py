"""`python -m models.eval` runs the retention study (`models.eval.cli.main`)."""

from models.eval.cli import main

if __name__ == "__main__":
    main()
