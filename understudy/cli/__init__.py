"""The `understudy` command: a thin composer of the packages below it (`main.py`). Nothing imports it."""
