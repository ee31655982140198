"""Generation inside the workers: what the front end (nxd_models.generation) sends through group.run.

decoding.py (causal LM sessions and the decode loop every session shares), speculative.py (draft
rounds), seq2seq.py and beam.py (T5), sampling.py (choosing tokens). Nothing here imports the front end.
"""
