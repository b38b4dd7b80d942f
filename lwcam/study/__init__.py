"""The paper's study on the :mod:`lwcam` library: profiles, the pipeline, tables T1–T5, figures F1–F9, the report.

The study imports the library and never the reverse; table and figure ids live only here.

* :mod:`~lwcam.study.profiles`: a run's typed settings (``params/<name>.yaml``).
* :mod:`~lwcam.study.pipeline`: run folders, cached artefacts, the notebooks run by papermill.
* :mod:`~lwcam.study.cli`: the command line, ``python -m lwcam.study run|evaluate``.
* :mod:`~lwcam.study.analysis` (T1, the fusion chosen on ``val``, the claims, F6, F7),
  :mod:`~lwcam.study.scorecard` (T4, F8) and :mod:`~lwcam.study.resolution` (T5, F9).
* :mod:`~lwcam.study.sharded` and :mod:`~lwcam.study.sharded_t4`: T2, T3 and T4 over ``torch.distributed``.
* :mod:`~lwcam.study.plots`: every figure.
* :mod:`~lwcam.study.answers`, :mod:`~lwcam.study.docs` and :mod:`~lwcam.study.report`: the README, the
  docs and the report site, read from the tables.
* :mod:`~lwcam.study.serve`: ``lwcam serve``, a profile's black box (or any model) on an inference server.
"""
