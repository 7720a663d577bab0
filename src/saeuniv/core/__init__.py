"""The pure science of saeuniv: arrays in, arrays out, no I/O, no logging, no global state.

- ``alignment``: which token positions of two models are compared;
- ``matching``: pairing the SAE features of two models (correlation, policy, threshold and
  token filters, with the pairs left after each);
- ``metrics``: similarity of paired decoder rows, one registry of metrics with their exact
  fast permutation nulls and random-subset draws;
- ``subspaces``: concept sets, feature labels and the per-category scores;
- ``depth``: relative depth, the nearest layer of another model, the middle band;
- ``significance``: the Benjamini-Hochberg correction and the significance rules.
"""
