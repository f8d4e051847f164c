#include "lib/greet.h"

std::string Greeting(const std::string& who) { return "hello from " + who; }
