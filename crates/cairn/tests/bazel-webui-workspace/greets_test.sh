#!/bin/sh
echo "greets_test says hello"
