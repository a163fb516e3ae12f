"""A run prints no third-party notice that is not the user's business."""

import logging
import warnings

from fedswarm.common.logs import quiet_third_party


def test_third_party_notices_are_dropped_and_the_rest_kept(caplog):
    import transformers  # noqa: F401  (its library logger and handler exist once imported)

    quiet_third_party()
    quiet_third_party()  # idempotent
    with caplog.at_level(logging.INFO):
        logging.getLogger("flwr").warning("fraction_evaluate is set to 0.0. Federated evaluation will be skipped.")
        logging.getLogger("flwr").warning("a real Flower warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["a real Flower warning"]
    child = logging.getLogger("transformers.models.llama.tokenization_llama")
    handler_filters = [f for h in logging.getLogger("transformers").handlers for f in h.filters]
    record = child.makeRecord(
        child.name, logging.WARNING, __file__, 1, "You are using the default legacy behaviour", (), None
    )
    assert handler_filters and not all(f.filter(record) for f in handler_filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()
        ray_tip = "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"
        warnings.warn(ray_tip, FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]
