"""The one error type that stops a run before training, naming the bad setting."""


class ConfigError(ValueError):
    """A configuration value is invalid.

    ``setting`` is the dotted config name (``privacy.sample.epsilon``) so that the
    message a user sees always points at what to change.
    """

    def __init__(self, setting: str, message: str):
        self.setting = setting
        super().__init__(f"{setting}: {message}")
