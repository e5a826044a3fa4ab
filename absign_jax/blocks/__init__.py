"""Blocks: what a block is (:mod:`.partition`) and which block is next (:mod:`.selection`).

The first two stages of a step's flow: the parameter tree is cut into blocks
(transformer layers, found by name, or an explicit partition), and a selection scheme
(depth-biased, uniform, cyclic, ...) says which block the next update changes.
"""
