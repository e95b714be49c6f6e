from devmeter.cli import run

run()
