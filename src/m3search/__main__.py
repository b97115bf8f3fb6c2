"""``python -m m3search`` runs the ``m3search`` command."""

from m3search.cli import main

if __name__ == "__main__":
    main(prog_name="m3search")
