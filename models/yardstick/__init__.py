"""An independent yardstick: DWI studies rendered apart from the training generator
(:mod:`models.yardstick.render`), scored through the service's own analysis
(:mod:`models.yardstick.bench`; ``python -m models.yardstick``)."""
