"""The CPU demo and its parts: :mod:`grace.demo.run` (``grace demo``, end to end), :mod:`grace.demo.synthetic`
(the synthetic visual question-answering task), :mod:`grace.demo.tiny` (tiny local checkpoints of every supported
family), :mod:`grace.demo.stats` (the paired bootstrap behind its verdicts) and :mod:`grace.demo.lsq`
(``grace lsq-demo``)."""
