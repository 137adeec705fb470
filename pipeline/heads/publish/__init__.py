"""The one publisher of stage two: heads return results, and only this package writes them.

``place`` says where a head's result goes (its folders in the staged run) and what publishing it gives the run
(``HeadOutcome``); ``heads`` writes each head's result (config.json, best.pt, report.md, its CSVs) and builds its
table rows; ``run`` writes a run's own files (a grid's table and best.pt) and run.json's record; ``report`` and
``table`` draw and write the reports; ``files`` holds the writers they share.
"""
