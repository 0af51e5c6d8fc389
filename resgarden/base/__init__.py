"""The ground floor of the engine, imported by every layer above and importing none of them: the
errors and exit codes, atomic writes, verified downloads, logging, the typed specs the entry
scripts hand to the engine, and how an entry script runs (``runner``, ``preemption``)."""
