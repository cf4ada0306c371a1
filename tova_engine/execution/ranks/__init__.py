"""The other ranks of a tensor-parallel engine (1..N-1), as rank 0's executor drives them:
each step's plan (`plan.py`), the loop every other rank runs (`loop.py`), and starting and
stopping their processes (`launch.py`)."""
