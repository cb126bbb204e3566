"""Models. Each is one module plus one YAML file in conf/model/ and follows models.base."""
