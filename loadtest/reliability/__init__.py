"""The longer reliability runs behind ``faults.py``'s modes: ``soak`` (``--soak``: memory, descriptors and
p99 over a long steady mix) and ``durability`` (``--durability``: appendfsync always against everysec)."""
