from lrdeploy.cli.app import run

run()
