"""`python -m models.builtin.train` trains the built-in model (`models.builtin.train.cli.main`)."""

from models.builtin.train.cli import main

if __name__ == "__main__":
    main()
