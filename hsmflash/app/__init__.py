"""The MicroPython app: signed app images (`build`) and the frozen boot verifier (`bootcode`)."""
