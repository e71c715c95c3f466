"""The instruments: the attribute reader, caption faithfulness, image metrics, the evaluation that
writes the report (its format is dalle2/core/report.py), the guidance sweep and the speed benchmark.
They measure the models; nothing below them imports them (tests/test_layering.py enforces it).
"""
