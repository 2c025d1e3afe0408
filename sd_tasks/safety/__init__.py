"""Safety: what Dreamline does to every image it takes in or makes. `screening` flags sexual content (NudeNet's
offline detector, or a screen of the operator's own); `marking` puts Dreamline's invisible watermark on every image it
generates and reads it back. The data stage screens training photos; evaluation, class images and serving screen and
mark what they generate. docs/safety.md says what this covers and what it leaves to the operator.

May use: models and the core.
"""
