"""Reading finished runs: aggregation over seeds (``aggregate``) and figures (``figures``).

Nothing here imports torch or writes into run directories: analysis only reads them.
"""
