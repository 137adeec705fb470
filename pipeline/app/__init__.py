"""The local web app (run_webcam.py --serve): a page for your classes, samples and webcam capture.

It composes stages, as pipeline/commands.py does, and may import them; nothing but an entry script imports it
(tests/test_architecture.py). Its packages are the optional requirements-app.txt.
"""
