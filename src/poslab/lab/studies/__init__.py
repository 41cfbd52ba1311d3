"""Studies: a paper's experiment (a table of the CoPE paper, a DAPE study, the demo) as one concept.

- `poslab.lab.studies.declaration`: `Study` (rows, parts, the paper's numbers; a task table or an
  LM extrapolation study) and the registry of every study;
- `poslab.lab.studies.runner`: ``poslab study NAME`` (also ``reproduce`` and ``lm-study``): every
  part's grid planned, trained and resumed, an LM study's parts scored;
- `poslab.lab.studies.page`: the page of either kind, README.md and results.csv;
- `poslab.lab.studies.layout`: the folders, ``OUT/<part>/<encoding>/seed<k>``, and the migration
  of the old LM-study layout.

A study's finished runs are recorded in its data file, ``OUT/data.jsonl``
(`poslab.lab.report.datafile`), and its page is built from that file alone.
"""
