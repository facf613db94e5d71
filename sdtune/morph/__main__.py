"""``python -m sdtune.morph``: the morph command (:func:`sdtune.morph.command.main`)."""

from sdtune.morph.command import main

if __name__ == "__main__":
    main()
