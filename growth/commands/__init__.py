"""The command layer: `growth search`, `growth compress`, `growth compare` (and the CLI in
growth/cli.py) read files and flags, call the library and write what they produce; nothing in
the library imports them."""
